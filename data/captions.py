"""Image–caption pairs for phase 2, from one of three sources:

    shapes            Shapes World scenes rendered on the fly (the default; no network)
    hf                a Hugging Face dataset in COCO-captions form (default `jxie/coco_captions`: columns
                      `image`, `filename`, `cocoid`, `caption`, one caption a row, ~5 rows per image)
    a local path      a folder of images with `metadata.jsonl` ({"file_name": ..., "text": ...} per line, the
                      `datasets` imagefolder convention), or COCO-style `.parquet` files (comma-separated)

Every source becomes a `CaptionSet`: a list of images (loaded lazily, as Pillow images) and a list of
(image index, caption) pairs, so that a frozen encoder can encode each image once however many captions it
has. Local sources hold out every 50th image for validation (data.prepare_text.held_out); the Hub's COCO
has its own validation split.
"""
import os

from data import shapes_world
from data.prepare_text import DataError, held_out


class CaptionSet:
    """images[i]() returns the i-th image; pairs are (image index, caption); scenes (Shapes World only) are
    the ground truth that generated captions are scored against."""

    def __init__(self, images, pairs, scenes=None, name=""):
        if not pairs:
            raise DataError(f"no image-caption pairs in {name}")
        self.images, self.pairs, self.scenes, self.name = images, pairs, scenes, name


def shapes_captions(split, n, seed, image_size):
    scenes = shapes_world.make_scenes(split, n, seed=seed)
    images = [lambda scene=scene: shapes_world.render(scene, image_size) for scene in scenes]
    pairs = [(i, shapes_world.caption(scene)) for i, scene in enumerate(scenes)]
    return CaptionSet(images, pairs, scenes, name=f"Shapes World {split}")


def _from_dataset(dataset, caption_column, key_column, keep, name):
    """Group the rows of a `datasets` table by image (rows sharing key_column share an image); keep(j) says
    whether the j-th distinct image belongs to this split. Images are decoded only when loaded."""
    import datasets
    if "image" not in dataset.column_names or caption_column not in dataset.column_names:
        raise DataError(f"{name} needs columns image and {caption_column} (has {', '.join(dataset.column_names)})")
    if not isinstance(dataset.features["image"], datasets.Image):  # e.g. {bytes, path} structs from plain parquet
        dataset = dataset.cast_column("image", datasets.Image())
    captions = dataset[caption_column]
    keys = dataset[key_column] if key_column in dataset.column_names else range(len(captions))
    first_row, pairs = {}, []
    for row, (key, text) in enumerate(zip(keys, captions)):
        if key not in first_row:
            first_row[key] = row
        pairs.append((key, text))
    chosen = [key for j, key in enumerate(first_row) if keep(j)]
    index = {key: i for i, key in enumerate(chosen)}
    images = [lambda row=first_row[key]: _decode(dataset, row, name) for key in chosen]
    pairs = [(index[key], text) for key, text in pairs if key in index and text]
    return CaptionSet(images, pairs, name=name)


def _decode(dataset, row, name):
    """The image of one row, or a DataError naming the row whose file cannot be decoded."""
    try:
        return dataset[row]["image"]
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's UnidentifiedImageError is an OSError
        raise DataError(f"the image of row {row} of {name} cannot be decoded "
                        f"({type(error).__name__}: {str(error)[:100]})") from None


def load_or_explain(loader, what, hint):
    """loader(), a `datasets` load; a failure to reach or read it (no network, no such files) becomes one
    DataError line naming what was loaded and how to do without it."""
    import datasets
    import huggingface_hub
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        return loader()
    except OSError as error:
        raise DataError(f"cannot load {what} ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                        f"{hint}") from None


def hub_captions(config, split):
    import datasets
    name = config["caption_dataset"]
    hint = ("to use local files instead: --caption_source=path/to/folder (images + metadata.jsonl) "
            "or --caption_source=captions.parquet")
    dataset = load_or_explain(lambda: datasets.load_dataset(name, split="validation" if split == "val" else "train"),
                              f"dataset {name} from the Hugging Face Hub", hint)
    return _from_dataset(dataset, "caption", "filename", lambda j: True, f"{name} {split}")


def local_captions(config, split):
    import datasets
    source = config["caption_source"]
    keep = lambda j: held_out(j) == (split == "val")
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "metadata.jsonl")):
            raise DataError(f"{source} has no metadata.jsonl (lines of {{\"file_name\": ..., \"text\": ...}})")
        dataset = load_or_explain(lambda: datasets.load_dataset("imagefolder", data_dir=source, split="train"),
                                  f"image folder {source}", "check metadata.jsonl and the image files")
        return _from_dataset(dataset, "text", "file_name", keep, f"{source} {split}")
    paths = source.split(",")
    for path in paths:
        if not os.path.isfile(path) or not path.endswith(".parquet"):
            raise DataError(f"caption source {path} is neither a folder nor a .parquet file")
    dataset = load_or_explain(lambda: datasets.load_dataset("parquet", data_files=paths, split="train"),
                              f"parquet files {source}", "they need columns image and caption (and filename)")
    return _from_dataset(dataset, "caption", "filename", keep, f"{source} {split}")


def caption_set(config, split):
    """The CaptionSet of `split` ("train" or "val") for config["caption_source"]."""
    source = config["caption_source"]
    if source == "shapes":
        n = config["train_images"] if split == "train" else config["eval_images"]
        return shapes_captions(split, n, config["seed"], config["image_size"])
    if source == "hf":
        return hub_captions(config, split)
    return local_captions(config, split)
