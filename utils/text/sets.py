"""Text sets: reading them (one description per line) and fetching the authors' own sets, hash-pinned.

The project ships its own sets in ``text_descriptions/`` (see its README). The sets the papers used belong
to the authors' repositories and are not committed here: ``fetch_original`` downloads them from those
repositories' public URLs (pinned to a commit), checks each file's SHA-256 and writes it to
``text_descriptions/external/`` (git-ignored). Scripts that are given ``text_descriptions/NAME.txt`` (or
PCLens' ``utils/text_descriptions/NAME.txt``) also look in ``text_descriptions/external/NAME.txt``, so the
original command lines work after a fetch.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from utils import LOG, REPO_ROOT
from utils.errors import InputError

TEXT_DIR = REPO_ROOT / "text_descriptions"
EXTERNAL = "external"  # sub-folder of a text folder where fetched (not committed) sets go
PCLENS_TEXT_FOLDER = ("utils", "text_descriptions")  # PCLens keeps its text sets there


# ----------------------------------------------------------------------------- reading
def _text_folders(folder: Path) -> list[Path]:
    """The folders a text set given in ``folder`` is looked for in: ``folder``, and when it is
    ``text_descriptions/`` or PCLens' ``utils/text_descriptions/``, the other one beside it (relative to the same
    root); then the project's ``text_descriptions/`` (each of these with its ``external/``)."""
    parts = folder.parts
    found = [folder]
    for n in (2, 1):  # utils/text_descriptions first, so that its last part alone does not match it
        if parts[-n:] in (PCLENS_TEXT_FOLDER, (TEXT_DIR.name,)):
            root = Path(*parts[:-n]) if len(parts) > n else Path(".")
            found += [root / TEXT_DIR.name, root.joinpath(*PCLENS_TEXT_FOLDER), TEXT_DIR]
            break
    unique: dict[Path, Path] = {}
    for f in found:
        for g in (f, f / EXTERNAL):
            unique.setdefault(g.resolve(), g)
    return list(unique.values())


def resolve_text_file(path: str | Path) -> Path:
    """``path`` if it exists, else the same name in ``external/`` beside it (where the fetch writes); a path in
    ``text_descriptions/`` or in PCLens' ``utils/text_descriptions/`` is also looked for in the other folder and
    in the project's ``text_descriptions/external/``. ``FileNotFoundError`` (one line, naming the fetch command
    for the authors' sets) when it is nowhere."""
    path = Path(path)
    folders = _text_folders(path.parent)
    for folder in folders:
        if (folder / path.name).is_file():
            return folder / path.name
    hint = ""
    if path.name in ORIGINAL_TEXT_SETS:
        hint = (f" It is one of the authors' sets: fetch it with `python text_descriptions/fetch_original.py "
                f"{path.name}`.")
    others = ", ".join(str(f / path.name) for f in folders[1:])
    raise FileNotFoundError(f"{path}: text set not found (nor {others}).{hint}")


def read_text_set(path: str | Path, what: str = "--data_path") -> list[str]:
    """The lines of a text set, one description per line, in file order (row i of the embeddings = line i).

    A final newline is fine; an empty (or blank) line anywhere else is an error, since it would silently
    become an embedding of nothing and shift nothing else.
    """
    path = resolve_text_file(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 text ({e})") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    lines = [l[:-1] if l.endswith("\r") else l for l in lines]
    if not lines:
        raise InputError(f"{what} {path}: the text set is empty")
    empty = [i + 1 for i, l in enumerate(lines) if not l.strip()]
    if empty:
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise InputError(f"{what} {path}: empty line(s) at line {', '.join(map(str, empty[:5]))}{more}; "
                         f"remove them (each line must be one description)")
    return lines


# ----------------------------------------------------------------------------- the authors' sets
CLIP_TEXT_SPAN = ("yossigandelsman/clip_text_span", "49f70f31bb13437a870ff8de340626b225500a22")
SECOND_ORDER_LENS = ("yossigandelsman/second_order_lens", "1d4fe4de23111feee8a62d6855ffec2105c4b710")
PCLENS = ("vstrozzi/PCLens-spectral-explainability-in-CLIP-ViT-encoder", "44f190fd5c8e940ab9ddb9a3786cbd12b2ccf236")


@dataclass(frozen=True)
class Source:
    """Where one of the authors' text files lives, and its SHA-256 when known (None: not pinned)."""
    repo: str
    commit: str
    sha256: Optional[str]
    folder: str = "text_descriptions"  # the file's folder inside the repository

    def url(self, name: str) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.folder}/{name}"


# SHA-256 of each file at the pinned commit (checked against the repositories' own copies of the files).
ORIGINAL_TEXT_SETS: dict[str, Source] = {
    "google_3498_english.txt": Source(*CLIP_TEXT_SPAN,
                                      "d9502487f471d07e44b8ae79e01fd03527ab032be2c7d721c1346f97efdaf2c5"),
    "image_descriptions_general.txt": Source(*CLIP_TEXT_SPAN,
                                             "39c6bf3e788684d9e0e8afa902c13aae1ee8eafefdbab94ba923fd05b9038630"),
    "30k.txt": Source(*SECOND_ORDER_LENS, "b96dfed9d570daddcc461e03c6009b7de6f72e515cb0a9eab35a9e1f21546f7b"),
    "image_descriptions_per_class.txt": Source(*SECOND_ORDER_LENS,
                                               "651520073306130e3f49d7e857f890da806c964f0ad9e2aa2b8ef1784778a67f"),
    "google_10000_english.txt": Source(*SECOND_ORDER_LENS,
                                       "996ca0bd092a50a333b4a0e87a3731feb0f6f8d4e1a18e58279562d7f9fc2394"),
    **{name: Source(*PCLENS, sha, folder="/".join(PCLENS_TEXT_FOLDER)) for name, sha in {
        "top_1500_nouns_5_sentences_imagenet_bias_clean.txt":
            "7a742e83ed736e75bcff4a92b3acca8e41e823edf2efb19c48a5c0464ea6d793",
        "top_1500_nouns_5_sentences_imagenet_clean.txt":
            "c0a000856b69c49707688a6bb7567e54ae3dd6c9211173b3c417231c385af762",
        "top_1500_nouns_5_sentences_imagenet.txt": "4cc641c6c4a794314558af78c75a4e56ab28dcd8da78c87c3214eccd5feab2ea",
        "top_1500_nouns_5_sentences_clean.txt": "9a3d0f32c32ae89e53159e062f63c5d47c1df55a53f4252df3a380dd3e48ecf1",
        "top_1500_nouns_clean.txt": "79e4f1d121d5aebaa9979254dd751b71d8414e5a3ce4c56f99d2622ace97f9c3",
        "imagenet_descriptions_personal.txt": "ec299652a77e8f0d948b67901d2fa53c7824f1d5f06c43f45767806f0f7835bd",
        "imagenet_descriptions_personal_clean.txt": "121d899350126ea2e7e855c14ff05813528acdaff154e9f4b822c922b83444ce",
        "visual_descriptions.txt": "3aba85b6ccc4fca400a44f935ee714d6a9b8ea068d555bee2d567099df102e4a",
        "topics.txt": "bd75124ba2ae9e906fd4e4e32f4897720a0ac2809dba80d0ae0c5b00cf071b21",
        "bias_words.txt": "757b61dd04ec346657aea15ffb03ad439bacfebb38aad5755162c3cdfdeaec81",
    }.items()},
}


# SpLiCE's files (AI4LIFE-GROUP/SpLiCE): concept vocabularies, one concept per line from the least to the most
# frequent, and image means, torch tensors [d] (normalised image embeddings averaged over MSCOCO). utils/splice.py
# fetches them on first use into its download root.
SPLICE = ("AI4LIFE-GROUP/SpLiCE", "9a498102ce7c6701f4afe361ffaa86c39b47fa5f")
SPLICE_FILES: dict[str, Source] = {
    "laion.txt": Source(*SPLICE, "aee8e260477dcfbc873f939955ffd472969859054ed46e245bbe8b37d10b508c",
                        folder="data/vocab"),
    "laion_bigrams.txt": Source(*SPLICE, "6561525228843aa8b0d2b27e731c8c2b18dac0e4bdda40761933b0aecda1e67a",
                                folder="data/vocab"),
    "mscoco.txt": Source(*SPLICE, "ddd84fc591b2e49c1513cc3dcc199153df276a44686712e21a6efb7711e2d43b",
                         folder="data/vocab"),
    "open_clip_ViT-B-32_image.pt": Source(*SPLICE, "6b91c6d0e9006e27dfb6f13e6d25a90c5ff24eb14e4ee60cf064a7ddf9f646b7",
                                          folder="data/means"),
    "clip_ViT-B-32_image.pt": Source(*SPLICE, "dbd73aec9162cc26d3850c042b2a035720c1f6d38fc0b64a73518995f884202b",
                                     folder="data/means"),
    "clip_ViT-B-16_image.pt": Source(*SPLICE, "2907555438ef16b4677cb72ad81b3c3fe8c9246028714e943dba6c3b91d67eee",
                                     folder="data/means"),
    "clip_RN50_image.pt": Source(*SPLICE, "e1ee3345ef6faf6f8ebc30f649189bf4e583fe71229b2955e227cf59124d42fa",
                                 folder="data/means"),
}


class HashMismatchError(InputError):
    """A downloaded file's SHA-256 differs from the pinned one (the file is not kept)."""


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_original(names: Optional[Iterable[str]] = None, dest: str | Path = TEXT_DIR / EXTERNAL,
                   allow_unpinned: bool = False, base_url: Optional[str] = None,
                   sources: Optional[dict[str, Source]] = None,
                   opener: Callable = urllib.request.urlopen, log: Callable[[str], None] = LOG.info) -> dict[str, Path]:
    """Download the authors' text sets into ``dest``, checking each file's SHA-256.

    Args:
        names: file names (default: all of ``sources``).
        dest: output folder (created).
        allow_unpinned: accept a file that has no pinned hash (its hash is printed so it can be pinned).
        base_url: a folder URL to take the files from instead of the pinned repository URLs (a mirror, or a
            ``file://`` folder), e.g. ``file:///data/text_descriptions/``; hashes are checked all the same.
        sources: the table of files (default ``ORIGINAL_TEXT_SETS``).
        opener: ``urlopen``-like callable (tests pass their own).

    A file already in ``dest`` with the pinned hash is kept. A download is written to ``NAME.partial`` and
    only renamed once its hash is accepted; a mismatch raises ``HashMismatchError`` and leaves nothing.
    """
    sources = ORIGINAL_TEXT_SETS if sources is None else sources
    names = list(sources) if names is None else list(names)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise InputError(f"unknown text set(s) {unknown}; known: {sorted(sources)}")
    refused = [n for n in names if sources[n].sha256 is None and not allow_unpinned]
    if refused:
        raise HashMismatchError(
            f"no pinned SHA-256 for {refused}: refusing to fetch them. Pass --allow-unpinned to download them "
            f"anyway (their hashes are printed so you can check and pin them).")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        src = sources[name]
        final = dest / name
        if final.is_file() and src.sha256 and sha256_of(final) == src.sha256:
            log(f"{final}: present, sha256 ok")
            out[name] = final
            continue
        url = base_url.rstrip("/") + "/" + name if base_url else src.url(name)
        tmp = final.with_name(final.name + ".partial")
        h = hashlib.sha256()
        try:
            with opener(url) as response, open(tmp, "wb") as f:
                for block in iter(lambda: response.read(1 << 20), b""):
                    h.update(block)
                    f.write(block)
        except Exception as e:  # network, missing file: nothing is left behind
            tmp.unlink(missing_ok=True)
            raise OSError(f"{name}: download from {url} failed: {e}") from e
        digest = h.hexdigest()
        if src.sha256 is not None and digest != src.sha256:
            tmp.unlink(missing_ok=True)
            raise HashMismatchError(f"{name} from {url}: sha256 {digest} differs from the pinned {src.sha256}; "
                                    f"refusing it (nothing written)")
        os.replace(tmp, final)
        state = "sha256 ok" if src.sha256 else f"UNPINNED, sha256 {digest}"
        log(f"wrote {final} ({final.stat().st_size:,} bytes, {state})")
        out[name] = final
    return out
