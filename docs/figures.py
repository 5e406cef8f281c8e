"""The README's figures, drawn as hand-written SVG (no plotting library).

    python docs/figures.py                                   # docs/architecture.svg and docs/masks.svg
    python docs/figures.py loss out/pretrain/log.txt docs/loss_pretrain.svg   # a run's train and val loss

The diagrams read the layer pattern and the masks from the code itself (pretrain.py's Transformer and
attention_mask), so they cannot drift from what the model does. The loss plot reads the lines a training run
printed (and wrote to <out_dir>/log.txt): "step N | loss X | ..." and "eval step N: val loss Y | ...".
"""
import html
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: config.py, pretrain.py

from config import ConfigError, run  # noqa: E402 (after the path is set)

ROPE, NOPE, MOE, DENSE = "#4c78a8", "#f58518", "#54a24b", "#9d9d9d"   # the colours every figure uses
INK, PALE = "#222222", "#f4f4f4"


class Svg:
    """A list of SVG elements and a few helpers: boxes, text, arrows."""

    def __init__(self, width, height):
        self.width, self.height, self.parts = width, height, []

    def rect(self, x, y, w, h, fill="white", stroke=INK, rx=6, dash=False):
        style = ' stroke-dasharray="5,4"' if dash else ""
        self.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{rx}" '
                          f'fill="{fill}" stroke="{stroke}"{style}/>')

    def text(self, x, y, words, size=13, anchor="middle", color=INK, bold=False):
        weight = ' font-weight="bold"' if bold else ""
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                          f'fill="{color}"{weight}>{html.escape(words)}</text>')

    def box(self, x, y, w, h, lines, fill="white", stroke=INK, size=13, dash=False):
        """A rounded box with lines of text centred in it; the first line bold."""
        self.rect(x, y, w, h, fill, stroke, dash=dash)
        top = y + h / 2 - (len(lines) - 1) * (size + 3) / 2 + size * 0.35
        for i, line in enumerate(lines):
            self.text(x + w / 2, top + i * (size + 3), line, size, bold=i == 0 and len(lines) > 1)

    def line(self, points, color=INK, arrow=True, dash=False, width=1.5):
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        head = ' marker-end="url(#arrow)"' if arrow else ""
        style = ' stroke-dasharray="4,3"' if dash else ""
        self.parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{width}"'
                          f'{head}{style}/>')

    def save(self, path):
        arrow = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
                 'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#222"/>'
                 '</marker></defs>')
        body = "\n".join(self.parts)
        with open(path, "w") as f:
            f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                    f'viewBox="0 0 {self.width} {self.height}" font-family="Helvetica, Arial, sans-serif">\n'
                    f'<rect width="100%" height="100%" fill="white"/>\n{arrow}\n{body}\n</svg>\n')
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------
# The decoder block, its two kinds of attention, the MoE, and the layer strip
# ----------------------------------------------------------------------------------------------------------

def layer_kinds(config):
    """[(is_moe, use_rope)] per layer, as pretrain.py's blocks decide them (built on the meta device: no
    memory, no time, so the 224M-parameter seed model costs nothing either)."""
    import torch
    from pretrain import Transformer
    with torch.device("meta"):
        model = Transformer(config)
    return [(block.is_moe, block.use_rope) for block in model.layers]


def layer_strip(svg, x, y, config, title, cell=52):
    svg.text(x, y - 8, title, 13, anchor="start", bold=True)
    for i, (is_moe, use_rope) in enumerate(layer_kinds(config)):
        left = x + i * (cell + 6)
        svg.rect(left, y, cell, 24, fill=ROPE if use_rope else NOPE, stroke="none", rx=3)
        svg.text(left + cell / 2, y + 16, "RoPE" if use_rope else "NoPE", 12, color="white", bold=True)
        svg.rect(left, y + 26, cell, 24, fill=MOE if is_moe else DENSE, stroke="none", rx=3)
        svg.text(left + cell / 2, y + 42, "MoE" if is_moe else "dense", 12, color="white", bold=True)
        svg.text(left + cell / 2, y + 64, f"layer {i}", 11)


def draw_block(svg, c):
    """Left column: one pre-norm decoder layer, top to bottom."""
    x, w = 70, 200
    svg.text(x + w / 2, 30, "one decoder layer (Block)", 15, bold=True)
    svg.box(x, 48, w, 30, ["x   (B, T, dim)"], fill=PALE)
    svg.box(x, 104, w, 30, ["RMSNorm"])
    svg.box(x, 160, w, 46, ["Attention (GQA)", f"{c['n_heads']} query / {c['n_kv_heads']} KV heads"],
            fill="#e3ecf5", stroke=ROPE)
    svg.box(x + w / 2 - 14, 230, 28, 28, ["+"])
    svg.box(x, 284, w, 30, ["RMSNorm"])
    svg.box(x, 340, w, 46, ["FFN", "MoE or dense SwiGLU"], fill="#e5f1e3", stroke=MOE)
    svg.box(x + w / 2 - 14, 410, 28, 28, ["+"])
    svg.box(x, 462, w, 30, ["out   (B, T, dim)"], fill=PALE)
    mid = x + w / 2
    for top, bottom in ((78, 104), (134, 160), (206, 230), (258, 284), (314, 340), (386, 410), (438, 462)):
        svg.line([(mid, top), (mid, bottom)])
    svg.line([(mid, 90), (x - 18, 90), (x - 18, 244), (mid - 14, 244)])   # the residual stream
    svg.line([(mid, 270), (x - 18, 270), (x - 18, 424), (mid - 14, 424)])
    svg.text(x - 24, 170, "residual", 11, anchor="end")
    svg.text(x + w / 2, 520, "h = x + attn(RMSNorm(x))", 12)
    svg.text(x + w / 2, 538, "out = h + ffn(RMSNorm(h))", 12)
    return x + w


def draw_attention(svg, c, left):
    """Middle column: the two kinds of attention layer (iRoPE)."""
    x, w = left, 300
    group = c["n_heads"] // c["n_kv_heads"]
    svg.text(x + w / 2, 30, "Attention: two kinds of layer (iRoPE)", 15, bold=True)
    svg.box(x, 48, w, 46, ["q_proj, k_proj, v_proj",
                           f"q: {c['n_heads']} heads, k and v: {c['n_kv_heads']} heads (GQA)"])
    lane = (w - 12) / 2
    svg.box(x, 120, lane, 130, ["RoPE layer", "rotate q, k by", "their position", "then L2-norm q, k",
                                "attend within the", f"chunk of {c['attn_chunk']} positions"],
            fill="#e3ecf5", stroke=ROPE, size=12)
    svg.box(x + lane + 12, 120, lane, 130, ["NoPE layer", "no rotation,", "no q/k norm;", "q temperature",
                                            "attend over the", "whole causal context"],
            fill="#fdebd9", stroke=NOPE, size=12)
    svg.line([(x + lane / 2, 94), (x + lane / 2, 120)])
    svg.line([(x + lane * 1.5 + 12, 94), (x + lane * 1.5 + 12, 120)])
    svg.box(x, 276, w, 62, ["softmax(q·kᵀ/√d + mask)·v", f"each KV head serves {group} query heads",
                            "(k, v repeated, as repeat_interleave would)"], size=12)
    svg.line([(x + lane / 2, 250), (x + lane / 2, 276)])
    svg.line([(x + lane * 1.5 + 12, 250), (x + lane * 1.5 + 12, 276)])
    svg.box(x, 364, w, 30, ["o_proj  →  (B, T, dim)"])
    svg.line([(x + w / 2, 338), (x + w / 2, 364)])
    return x + w


def draw_moe(svg, c, left):
    """Right column: the mixture of experts with its shared expert."""
    x, w = left, 300
    svg.text(x + w / 2, 30, "MoE: router → top-k → experts", 15, bold=True)
    svg.box(x, 48, w, 46, [f"router  Linear(dim, {c['n_experts']})",
                           f"top-{c['top_k']} per token, gate = sigmoid(score)"])
    n, size, gap = c["n_experts"], 28, 6
    row = n * size + (n - 1) * gap
    start = x + (w - row) / 2
    chosen = {1, 5}  # an example token's top-2
    for e in range(n):
        ex = start + e * (size + gap)
        svg.box(ex, 130, size, 40, [f"E{e}"], fill=MOE if e in chosen else "white",
                stroke=MOE, size=11)
        if e in chosen:
            svg.line([(x + w / 2, 94), (ex + size / 2, 130)], color=MOE)
    svg.text(x + w / 2, 190, "gate × input → each chosen expert (SwiGLU)", 12)
    svg.box(x, 240, w, 40, ["shared expert (SwiGLU)", "sees every token"], fill="#e5f1e3", stroke=MOE,
            size=12)
    svg.box(x + w / 2 - 14, 306, 28, 28, ["+"])
    svg.line([(x + w / 2, 280), (x + w / 2, 306)])
    for e in chosen:
        ex = start + e * (size + gap) + size / 2
        svg.line([(ex, 170), (ex, 200), (x + w + 10, 200), (x + w + 10, 320), (x + w / 2 + 14, 320)],
                 color=MOE)
    svg.text(x + w / 2, 360, "out = shared(x) + Σ over top-k of expertₑ(gateₑ · x)", 12)
    svg.text(x + w / 2, 378, "compute grows with top-k, parameters with n_experts", 12)
    svg.box(x, 400, w, 46, ["dense layers instead:", "SwiGLU  down(silu(gate(x)) · up(x))"], fill=PALE,
            stroke=DENSE, size=12)


def architecture(path):
    from config import CONFIG, PRESETS
    seed = dict(CONFIG, **{k: v for k, v in PRESETS["llama4_seed"].items() if not isinstance(v, dict)})
    svg = Svg(1040, 740)
    right = draw_block(svg, CONFIG)
    right = draw_attention(svg, CONFIG, right + 50)
    draw_moe(svg, CONFIG, right + 50)
    layer_strip(svg, 40, 600, CONFIG, f"default (config.py): {CONFIG['n_layers']} layers, dim {CONFIG['dim']}")
    layer_strip(svg, 350, 600, seed, f"llama4_seed: {seed['n_layers']} layers, dim {seed['dim']}", cell=46)
    svg.text(40, 700, "RoPE layers attend within a chunk; NoPE layers attend globally. MoE on every "
             f"{CONFIG['moe_every']}nd layer, NoPE on every {CONFIG['nope_every']}th (config.py: moe_every, "
             "nope_every).", 12, anchor="start")
    svg.text(40, 720, "Embedding → layers → RMSNorm → LM head (untied). Numbers are the default model's; "
             "the seed's are 12 query / 4 KV heads, chunk 512.", 12, anchor="start")
    svg.save(path)


def masks(path, length=8, chunk=4):
    """Which keys each query may attend to, on a RoPE layer (chunked causal) and a NoPE layer (causal)."""
    import torch
    from pretrain import attention_mask
    cell, gap = 26, 90
    svg = Svg(2 * length * cell + gap + 120, length * cell + 130)
    for k, (title, layer_chunk, color) in enumerate(((f"RoPE layer: chunk {chunk}", chunk, ROPE),
                                                    ("NoPE layer: whole causal context", None, NOPE))):
        mask = attention_mask(length, 0, layer_chunk, torch.device("cpu"))
        x0, y0 = 60 + k * (length * cell + gap), 60
        svg.text(x0 + length * cell / 2, 24, title, 14, bold=True)
        svg.text(x0 + length * cell / 2, 44, "key position →", 11)
        svg.text(x0 - 4, 44, "query ↓", 11, anchor="end")
        for q in range(length):
            svg.text(x0 - 8, y0 + q * cell + cell * 0.65, str(q), 11, anchor="end")
            svg.text(x0 + q * cell + cell / 2, y0 + length * cell + 14, str(q), 11)
            for key in range(length):
                fill = color if mask[q, key] else "white"
                svg.rect(x0 + key * cell, y0 + q * cell, cell, cell, fill=fill, stroke="#cccccc", rx=0)
    svg.text(svg.width / 2, y0 + length * cell + 40, f"T = {length}: query 5 sees keys 4-5 on a RoPE layer, "
             f"keys 0-5 on a NoPE layer", 12)
    svg.save(path)


# ----------------------------------------------------------------------------------------------------------
# A run's train and val loss, from its printed lines
# ----------------------------------------------------------------------------------------------------------

STEP_LINE = re.compile(r"^step\s+(\d+) \| loss ([0-9.]+)")
EVAL_LINE = re.compile(r"^eval step (\d+): val loss ([0-9.]+)")
BASELINE = re.compile(r"frequencies alone gives? val loss ([0-9.]+)")


def read_log(path):
    """(train [(step, loss)], val [(step, loss)], the unigram baseline or None) from a run's printed lines."""
    train, val, baseline = [], [], None
    with open(path, errors="replace") as f:
        for line in f:
            if match := STEP_LINE.match(line):
                train.append((int(match[1]), float(match[2])))
            elif match := EVAL_LINE.match(line):
                val.append((int(match[1]), float(match[2])))
            elif match := BASELINE.search(line):
                baseline = float(match[1])
    return train, val, baseline


def nice_step(last_step, most=6):
    """The tick spacing 1, 2 or 5 x 10^k that puts at most `most` ticks on 0..last_step."""
    spacing = 10 ** math.floor(math.log10(max(last_step, 1)))
    while last_step / spacing > most:
        spacing *= 2 if str(spacing)[0] in "15" else 2.5
    while last_step / spacing < most / 2.5 and spacing >= 2:
        spacing /= 2
    return spacing


def loss_plot(log_path, path):
    train, val, baseline = read_log(log_path)
    if not train:
        raise ConfigError(f"{log_path} has no 'step N | loss X' lines; point it at a training run's log.txt")
    width, height, left, top, plot_w, plot_h = 720, 420, 70, 40, 600, 300
    last_step = max(step for step, _ in train + val)
    losses = [loss for _, loss in train + val] + ([baseline] if baseline else [])
    low, high = math.log(min(losses) * 0.9), math.log(max(losses) * 1.1)  # a log axis: early and late both show
    px = lambda step: left + plot_w * step / last_step
    py = lambda loss: top + plot_h * (high - math.log(loss)) / (high - low)
    svg = Svg(width, height)
    svg.text(left + plot_w / 2, 24, f"train and val loss of {log_path}", 14, bold=True)
    svg.rect(left, top, plot_w, plot_h, fill="white", stroke="#999999", rx=0)
    for tick in (0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.5, 2, 3, 4, 6, 8, 12):
        if low <= math.log(tick) <= high:
            svg.line([(left, py(tick)), (left + plot_w, py(tick))], color="#e0e0e0", arrow=False, width=1)
            svg.text(left - 6, py(tick) + 4, f"{tick:g}", 11, anchor="end")
    spacing, step = nice_step(last_step), 0
    while step <= last_step:
        svg.text(px(step), top + plot_h + 16, f"{step:,.0f}", 11)
        step += spacing
    svg.text(left + plot_w / 2, top + plot_h + 36, "optimizer step (loss axis: log scale)", 12)
    if baseline:
        svg.line([(left, py(baseline)), (left + plot_w, py(baseline))], color="#888888", arrow=False, dash=True)
        svg.text(left + plot_w - 4, py(baseline) - 5, f"token frequencies alone: {baseline:.3f}", 11,
                 anchor="end", color="#666666")
    svg.line([(px(s), py(v)) for s, v in train], color=ROPE, arrow=False)
    if val:
        svg.line([(px(s), py(v)) for s, v in val], color=NOPE, arrow=False, width=2)
        for s, v in val:
            svg.rect(px(s) - 3, py(v) - 3, 6, 6, fill=NOPE, stroke="none", rx=3)
    key_x, key_y = left + plot_w - 280, top + plot_h * 0.45  # where the curves have already come down
    svg.line([(key_x, key_y), (key_x + 24, key_y)], color=ROPE, arrow=False)
    svg.text(key_x + 30, key_y + 4, "train loss (the logged step's)", 12, anchor="start")
    svg.line([(key_x, key_y + 20), (key_x + 24, key_y + 20)], color=NOPE, arrow=False, width=2)
    final = f", final {val[-1][1]:.4f}" if val else ""
    svg.text(key_x + 30, key_y + 24, f"val loss (held-out documents{final})", 12, anchor="start")
    svg.save(path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        architecture(os.path.join(HERE, "architecture.svg"))
        masks(os.path.join(HERE, "masks.svg"))
    elif argv[0] == "loss" and len(argv) == 3:
        if not os.path.isfile(argv[1]):
            raise ConfigError(f"no such log file: {argv[1]}")
        loss_plot(argv[1], argv[2])
    else:
        raise ConfigError("usage: python docs/figures.py  |  python docs/figures.py loss LOG.txt OUT.svg")


if __name__ == "__main__":
    run(main)
