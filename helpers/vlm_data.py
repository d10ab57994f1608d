"""The VLM track's data: the kit's own picture, scripted conversations about it, and LLaVA-format files.

LLaVA format: [{"id": ..., "image": "file.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}]; `<image>` appears once, in the first human turn. Image paths are
taken relative to the JSON file's folder (absolute paths work too).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .data import DataError, _read_records, atomic_write_text
from .paths import DATA_DIR

IMAGE_TOKEN = "<image>"
PICTURE_FILE = DATA_DIR / "vlm_picture.png"
CONVERSATIONS_FILE = DATA_DIR / "vlm_conversations.json"  # stage 2: scripted questions and answers, 6 x 3 turns
HOMEWORK_CONVERSATIONS_FILE = DATA_DIR / "vlm_conversations_homework.json"  # 6 x 10 turns, as the course's
# Each preset's conversations: the tiny one keeps 3 turns (its evaluation rounds ask every question, on a CPU).
PRESET_CONVERSATIONS = {"tiny": CONVERSATIONS_FILE, "homework": HOMEWORK_CONVERSATIONS_FILE}
CAPTIONS_FILE = DATA_DIR / "vlm_captions.json"            # stage 1: caption pairs
ROLE_NAMES = {"human": "user", "gpt": "assistant"}


class LlavaDataError(DataError):
    """Bad LLaVA-format data; the message names the file, record, field and the fix."""


# ---------------------------------------------------------------- the picture
def draw_picture(path: str | os.PathLike = PICTURE_FILE, size: int = 256) -> Path:
    """Draw the kit's picture (blue sky, yellow sun top right, red house with a brown door, one green tree)."""
    from PIL import Image, ImageDraw

    s = size / 256  # everything is laid out on a 256 grid and scaled
    img = Image.new("RGB", (size, size), (135, 190, 235))
    d = ImageDraw.Draw(img)
    box = lambda *xy: [round(v * s) for v in xy]  # noqa: E731
    d.rectangle(box(0, 190, 256, 256), fill=(70, 160, 60))                 # grass
    d.ellipse(box(196, 16, 240, 60), fill=(250, 210, 40))                  # sun
    d.rectangle(box(90, 120, 180, 200), fill=(200, 40, 40))                # house
    d.polygon(box(80, 122, 135, 78, 190, 122), fill=(150, 30, 30))         # roof
    d.rectangle(box(122, 155, 146, 200), fill=(110, 70, 30))               # door
    d.rectangle(box(36, 140, 46, 200), fill=(100, 65, 30))                 # trunk
    d.ellipse(box(16, 96, 66, 150), fill=(30, 130, 40))                    # crown
    return _save_png(img, path)


def _save_png(img, path) -> Path:
    """Written beside and renamed into place, so a half-written picture is never read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def draw_control_picture(path: str | os.PathLike, size: int = 256) -> Path:
    """A picture the model never trains on (night sky, white moon, a boat on the sea): the control."""
    from PIL import Image, ImageDraw

    s = size / 256
    img = Image.new("RGB", (size, size), (20, 25, 70))
    d = ImageDraw.Draw(img)
    box = lambda *xy: [round(v * s) for v in xy]  # noqa: E731
    d.rectangle(box(0, 160, 256, 256), fill=(30, 70, 140))                 # sea
    d.ellipse(box(30, 24, 80, 74), fill=(240, 240, 225))                   # moon
    d.polygon(box(110, 170, 210, 170, 190, 195, 130, 195), fill=(160, 100, 50))  # hull
    d.polygon(box(160, 90, 160, 165, 205, 165), fill=(245, 245, 245))      # sail
    return _save_png(img, path)


# ---------------------------------------------------------------- reading and checking
def _where(path: Path, index: int, line: int) -> str:
    return f"{path}: record {index} (line {line})"


def _check_image(record: dict, where: str, base: Path) -> Path:
    from PIL import Image, UnidentifiedImageError

    name = record.get("image")
    if not isinstance(name, str) or not name.strip():
        raise LlavaDataError(f"{where}: field 'image' is missing or empty; name the picture file, e.g. \"image\": \"picture.png\".")
    image = Path(name) if Path(name).is_absolute() else base / name
    if not image.is_file():
        raise LlavaDataError(f"{where}: field 'image' names {name!r}, but {image} does not exist; "
                             "put the picture there or fix the path (relative to the JSON file's folder).")
    try:
        with Image.open(image) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise LlavaDataError(f"{where}: field 'image' file {image} is not a readable image ({type(e).__name__}); "
                             "replace it with a valid PNG or JPEG.") from None
    return image


def _check_turns(record: dict, where: str) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise LlavaDataError(f"{where}: field 'conversations' must be a non-empty list of {{\"from\", \"value\"}} turns.")
    messages = []
    for t, turn in enumerate(turns):
        field = f"{where}: field 'conversations[{t}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise LlavaDataError(f"{field}' needs both 'from' and 'value' keys.")
        expected = "human" if t % 2 == 0 else "gpt"
        if turn["from"] not in ROLE_NAMES:
            raise LlavaDataError(f"{field}.from' is {turn['from']!r}; use 'human' or 'gpt' (turns alternate, human first).")
        if turn["from"] != expected:
            raise LlavaDataError(f"{field}.from' is {turn['from']!r} but turn {t} must be {expected!r}; "
                                 "turns alternate human, gpt, human, ... starting with human.")
        value = turn["value"]
        if not isinstance(value, str) or not value.replace(IMAGE_TOKEN, "").strip():
            raise LlavaDataError(f"{field}.value' is empty; write the text of the turn or drop the turn.")
        count = value.count(IMAGE_TOKEN)
        if t == 0 and count == 0:
            raise LlavaDataError(f"{field}.value' has no {IMAGE_TOKEN}; start the first human turn with '{IMAGE_TOKEN}\\n'.")
        if count > (1 if t == 0 else 0):
            raise LlavaDataError(f"{field}.value' has {IMAGE_TOKEN} {count} time(s) but it must appear exactly once, "
                                 "in the first human turn; remove the extra ones.")
        messages.append({"role": ROLE_NAMES[turn["from"]], "content": value})
    if messages[-1]["role"] != "assistant":
        raise LlavaDataError(f"{where}: field 'conversations' ends with a human turn; add the gpt answer to train on.")
    return messages


def load_llava_data(path: str | os.PathLike) -> list[tuple[Path, list[dict]]]:
    """Read and validate a LLaVA-format file: a list of (image path, chat messages) with <image> in the first user turn."""
    path = Path(path)
    try:
        records = _read_records(path)
    except DataError as e:
        raise LlavaDataError(str(e)) from None
    if not records:
        raise LlavaDataError(f"{path}: the file has no records; write at least one.")
    samples, checked = [], {}
    for i, (record, line) in enumerate(records):
        where = _where(path, i, line)
        if not isinstance(record, dict):
            raise LlavaDataError(f"{where} is a {type(record).__name__}, not an object; "
                                 "each record is {\"image\": ..., \"conversations\": [...]}.")
        key = record.get("image")
        image = checked[key] if isinstance(key, str) and key in checked else _check_image(record, where, path.parent)
        checked[key] = image
        samples.append((image, _check_turns(record, where)))
    return samples


def validate_llava_data(path: str | os.PathLike) -> dict:
    """Check a LLaVA-format file with its images; a short summary, or LlavaDataError with one sentence."""
    samples = load_llava_data(path)
    return {"file": str(path), "format": "llava", "records": len(samples),
            "turns": sum(sum(m["role"] == "assistant" for m in msgs) for _, msgs in samples),
            "images": len({img for img, _ in samples})}


# ---------------------------------------------------------------- making data
def _shipped(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def preset_conversations(preset: str, conversations_file: str | os.PathLike | None = None) -> Path:
    """The conversations a VLM run trains on: the student's file when given, else the preset's own."""
    if conversations_file:
        return Path(conversations_file).expanduser()
    if preset not in PRESET_CONVERSATIONS:
        raise LlavaDataError(f"preset is {preset!r}; use 'tiny' or 'homework' (or give conversations_file).")
    return PRESET_CONVERSATIONS[preset]


def scripted_qa(conversations_file: str | os.PathLike = CONVERSATIONS_FILE) -> dict[str, str]:
    """question -> expected answer, in first-seen order, from a LLaVA-format conversations file."""
    qa: dict[str, str] = {}
    for _, messages in load_llava_data(conversations_file):
        for q, a in zip(messages[::2], messages[1::2]):
            qa.setdefault(q["content"].replace(IMAGE_TOKEN, "").strip(), a["content"])
    return qa


def make_llava_data(out_dir: str | os.PathLike, image: str | os.PathLike = PICTURE_FILE,
                    conversations_file: str | os.PathLike = CONVERSATIONS_FILE,
                    captions_file: str | os.PathLike = CAPTIONS_FILE, repeats: int = 20,
                    caption_repeats: int | None = None) -> dict[str, Path]:
    """Write stage-1 (captions) and stage-2 (conversations) LLaVA files into `out_dir`, with the image copied there.

    Every record of the source files is pointed at `image` and repeated `repeats` times (the course: 6 x 200).
    """
    if repeats < 1:
        raise LlavaDataError(f"repeats is {repeats}; use 1 or more (the course repeats each conversation 200 times).")
    image = Path(image)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Check the sources first (their images are the kit's picture); then retarget them at `image`.
    load_llava_data(conversations_file)
    load_llava_data(captions_file)
    probe = out_dir / ".probe.json"
    atomic_write_text(probe, json.dumps([{"image": str(image.resolve()), "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n?"}, {"from": "gpt", "value": "."}]}]))
    try:
        load_llava_data(probe)  # the same sentences for a bad image as for bad data
    finally:
        probe.unlink()
    local = out_dir / f"image{image.suffix.lower() or '.png'}"
    if image.resolve() != local.resolve():
        shutil.copyfile(image, local)
    written = {"image": local}
    for name, source, n in (("captions", captions_file, caption_repeats or repeats),
                            ("conversations", conversations_file, repeats)):
        records = [dict(r, image=local.name) for r in _shipped(Path(source))]
        out = [dict(r, id=f"{r.get('id', name)}-{k}") for k in range(n) for r in records]
        path = out_dir / f"{name}.json"
        atomic_write_text(path, json.dumps(out, ensure_ascii=False, indent=1) + "\n")
        written[name] = path
    return written
