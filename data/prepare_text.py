"""Text preparation: train the byte-level BPE tokenizer and write the token streams.

    python -m data.prepare_text                                       # Shapes World -> data/shapes/
    python -m data.prepare_text --text_source=hf --data_dir=data/cosmopedia --vocab_size=32000
    python -m data.prepare_text --text_source=notes/*.txt --data_dir=data/notes

(`python pretrain.py` runs this itself when its data_dir has not been prepared yet.)

A prepared dataset is a folder holding
    tokenizer.json   the trained tokenizer (Hugging Face `tokenizers` format)
    train.bin        every training document as <|begin_of_text|> text <|end_of_text|>, concatenated, uint16
    val.bin          the same for held-out documents (whole documents, never a slice of a training one)
    meta.json        sizes and provenance; written last, so its presence means the folder is complete

Sources: "shapes" (the built-in Shapes World corpus), "hf" (a Hugging Face dataset streamed with `datasets`,
so only the documents used are downloaded), or local files: `.txt` (documents separated by blank lines),
`.jsonl` (one JSON object per line, text under `text_column`) and `.parquet` (column `text_column`).
"""
import glob
import json
import os
import time

import numpy as np

from config import UserError

# Special tokens are reserved when the tokenizer is trained, so they get the first ids and no later phase ever
# has to resize the vocabulary: phase 2 needs <|image|>, phase 3 the chat markers.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|image|>",
                  "<|user|>", "<|assistant|>", "<|eot|>"]
BOS_ID, EOS_ID, PAD_ID, IMAGE_ID, USER_ID, ASSISTANT_ID, EOT_ID = range(len(SPECIAL_TOKENS))
VAL_EVERY = 50  # the held-out split, everywhere: documents, caption images and conversations 49, 99, 149, ...


def held_out(index):
    """Whether item `index` (counting from 0) of a source belongs to the validation split."""
    return index % VAL_EVERY == VAL_EVERY - 1


class DataError(UserError, RuntimeError):
    """Text, images or a cache that cannot be read or prepared; the message says what to do."""


class Progress:
    """A line every `every` seconds while a long job runs, with the count, the rate and the time left:
        reading HuggingFaceTB/smollm-corpus: 90,000,000/900,000,000 characters (10%), 1,500,000/s, 9 min left
    A job shorter than `every` seconds prints nothing."""

    def __init__(self, what, total, unit, every=10.0, clock=time.monotonic):
        self.what, self.total, self.unit, self.every, self.clock = what, total, unit, every, clock
        self.start = self.last = clock()

    def update(self, done):
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(done, now - self.start), flush=True)

    def line(self, done, elapsed):
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else float("inf")
        return (f"  {self.what}: {done:,}/{self.total:,} {self.unit} ({100 * done / self.total:.0f}%), "
                f"{rate:,.0f}/s, {duration(left)} left")


def duration(seconds):
    """45 s, 12 min, 3 h 05 min."""
    if seconds == float("inf"):
        return "unknown time"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:02.0f} min"


def train_tokenizer(documents, vocab_size):
    """Byte-level BPE: the 256 byte values are the initial alphabet, so any Unicode string encodes to
    something (no unknown token) and decodes back exactly; merges then learn frequent byte sequences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, "special tokens must sit at fixed ids"
    return tokenizer


def shapes_documents(config):
    """Shapes World scene descriptions: the training split's scenes, then the validation split's."""
    from data.shapes_world import text_documents
    n_val = max(1, config["shapes_docs"] // VAL_EVERY)
    return text_documents("train", config["shapes_docs"], seed=config["seed"]), \
        text_documents("val", n_val, seed=config["seed"])


def hub_documents(config):
    """Stream a Hugging Face dataset; nothing beyond the documents we read is downloaded."""
    import datasets
    import huggingface_hub
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    name, subset = config["hf_dataset"], config["hf_config"] or None
    try:
        stream = datasets.load_dataset(name, subset, split="train", streaming=True)
        for row in stream:
            yield row[config["text_column"]]
    except OSError as error:  # ConnectionError and the Hub client's HTTP errors are OSErrors
        raise DataError(f"cannot reach the Hugging Face Hub for dataset {name} ({type(error).__name__}); "
                        f"to train on local files instead: python pretrain.py --text_source=my/*.txt "
                        f"--data_dir=data/mytext") from None
    except KeyError:
        raise DataError(f"dataset {name} has no column {config['text_column']!r}; set --text_column") from None


def local_documents(config):
    """Documents from local .txt / .jsonl / .parquet files (a comma-separated list of paths or globs)."""
    paths = []
    for pattern in config["text_source"].split(","):
        matches = sorted(glob.glob(pattern)) or [pattern]
        paths.extend(matches)
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"text file not found: {path}")
        if os.path.getsize(path) == 0:
            raise DataError(f"text file is empty: {path}")
        yield from _read_file(path, config["text_column"])


def _read_file(path, column):
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        yield from (doc.strip() for doc in text.split("\n\n") if doc.strip())
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)[column]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{line_no}: not a JSON object with a {column!r} text field")
                    yield text
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if column not in table.column_names:
            raise DataError(f"{path} has no column {column!r} (it has {', '.join(table.column_names)})")
        yield from (text for text in table.column(column).to_pylist() if text)
    else:
        raise DataError(f"unsupported text file {path}: use .txt, .jsonl or .parquet")


def split_documents(documents, config):
    """Every VAL_EVERY-th document goes to validation; the rest to training."""
    train, val = [], []
    for i, doc in enumerate(documents):
        (val if held_out(i) else train).append(doc)
    if not train or not val:
        raise DataError(f"need at least {VAL_EVERY} documents to hold some out for validation, "
                        f"got {len(train) + len(val)} from {config['text_source']}")
    return train, val


def write_tokens(path, documents, tokenizer, max_tokens=None):
    """Encode documents as <|begin_of_text|> text <|end_of_text|> and append them to a uint16 file, up to
    max_tokens tokens."""
    n_tokens = 0
    tokenizer.encode_special_tokens = True  # "<|image|>" written in a document is text, not the control token
    progress = Progress(f"encoding {os.path.basename(path)}", len(documents), "documents")
    tmp = f"{path}.{os.getpid()}.tmp"  # machines that share a disk each prepare (pretrain.once_per_node): own file
    with open(tmp, "wb") as f:
        for start in range(0, len(documents), 1000):
            progress.update(start)
            batch = tokenizer.encode_batch(documents[start:start + 1000], add_special_tokens=False)
            ids = [[BOS_ID, *encoding.ids, EOS_ID] for encoding in batch]
            flat = np.fromiter((i for doc in ids for i in doc), dtype=np.uint16)
            if max_tokens:
                flat = flat[:max_tokens - n_tokens]
            flat.tofile(f)
            n_tokens += len(flat)
            if max_tokens and n_tokens >= max_tokens:
                break
    tokenizer.encode_special_tokens = False
    os.replace(tmp, path)
    return n_tokens


def unigram_loss(out, vocab_size):
    """The baseline a model must beat: validation cross-entropy (nats/token) when every token is predicted
    from its training frequency alone (add-one smoothed), ignoring all context."""
    train = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16)
    counts = np.bincount(train, minlength=vocab_size) + 1.0
    return float(-np.log(counts[val] / counts.sum()).mean())


def read_documents(config):
    """(train, val) document lists for the configured source. Hub and local text are read only up to
    roughly max_tokens (4.5 characters per token) so that streaming stops early."""
    source = config["text_source"]
    if source == "shapes":
        return shapes_documents(config)
    stream = hub_documents(config) if source == "hf" else local_documents(config)
    documents, n_chars, enough = [], 0, int(4.5 * config["max_tokens"])
    progress = Progress(f"reading {config['hf_dataset'] if source == 'hf' else source}", enough, "characters")
    for doc in stream:
        documents.append(doc)
        n_chars += len(doc)
        progress.update(n_chars)
        if n_chars > enough:
            if len(documents) < VAL_EVERY:
                raise DataError(f"--max_tokens={config['max_tokens']} stops reading after {len(documents)} "
                                f"documents, fewer than the {VAL_EVERY} needed to hold some out; raise it")
            break
    return split_documents(documents, config)


def data_settings(config):
    """The config entries that decide what a prepared folder holds. (Not the seed: Shapes World documents of
    another seed are as good, and a training-seed sweep should not need a folder each.)"""
    keys = ["text_source", "max_tokens"]
    keys += ["shapes_docs"] if config["text_source"] == "shapes" else ["hf_dataset", "hf_config", "text_column"]
    settings = {key: config[key] for key in keys}
    if config["text_source"] == "shapes":  # the generator's own version: its documents changed with it
        from data.shapes_world import CORPUS_VERSION
        settings["shapes_corpus"] = CORPUS_VERSION
    return settings


def prepare(config):
    """Prepare config["data_dir"] from config["text_source"]; returns the meta dict."""
    out = config["data_dir"]
    if not 256 + len(SPECIAL_TOKENS) <= config["vocab_size"] <= 65536:  # every byte + the specials; uint16 ids
        raise DataError(f"--vocab_size={config['vocab_size']}: a byte-level BPE tokenizer needs "
                        f"{256 + len(SPECIAL_TOKENS)} to 65536 ids")
    train_docs, val_docs = read_documents(config)
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):
        os.remove(os.path.join(out, "meta.json"))  # until the new one is written, the folder is unfinished
    print(f"preparing {out}: {len(train_docs):,} training and {len(val_docs):,} validation documents; "
          f"training a {config['vocab_size']:,}-token BPE tokenizer...", flush=True)
    tokenizer = train_tokenizer(train_docs[:200_000], config["vocab_size"])
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    n_train = write_tokens(os.path.join(out, "train.bin"), train_docs, tokenizer, config["max_tokens"])
    n_val = write_tokens(os.path.join(out, "val.bin"), val_docs, tokenizer)
    meta = dict(source=config["text_source"], vocab_size=config["vocab_size"], settings=data_settings(config),
                tokenizer_vocab=tokenizer.get_vocab_size(), train_tokens=n_train, val_tokens=n_val,
                unigram_val_loss=unigram_loss(out, config["vocab_size"]),
                train_documents=len(train_docs), val_documents=len(val_docs), special_tokens=SPECIAL_TOKENS)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {n_train:,} training and {n_val:,} validation tokens "
          f"(tokenizer uses {meta['tokenizer_vocab']:,} of {config['vocab_size']:,} ids); "
          f"predicting tokens from their frequencies alone gives val loss {meta['unigram_val_loss']:.3f}", flush=True)
    return meta


if __name__ == "__main__":
    from config import get_config, run
    run(lambda: prepare(get_config("prepare")))
