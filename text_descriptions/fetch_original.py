"""Download the authors' text sets (not committed here) into text_descriptions/external/, SHA-256 checked.

  google_3498_english.txt, image_descriptions_general.txt      from yossigandelsman/clip_text_span
  30k.txt, image_descriptions_per_class.txt, google_10000_english.txt   from yossigandelsman/second_order_lens
  top_1500_nouns_5_sentences_imagenet_bias_clean.txt   from vstrozzi/PCLens-spectral-explainability-in-CLIP-ViT-encoder

Each file comes from a commit-pinned URL. A file whose SHA-256 differs from the pinned one is refused and
nothing is written; a file with no pinned hash is refused unless --allow-unpinned is given (its hash is then
printed). Scripts given text_descriptions/NAME.txt also look in text_descriptions/external/.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.text.sets import EXTERNAL, ORIGINAL_TEXT_SETS, TEXT_DIR, HashMismatchError, fetch_original  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Fetch the authors' text sets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=None, help=f"files to fetch (default: all of "
                        f"{', '.join(ORIGINAL_TEXT_SETS)})")
    parser.add_argument("--dest", default=str(TEXT_DIR / EXTERNAL), help="output folder")
    parser.add_argument("--allow-unpinned", "--allow_unpinned", dest="allow_unpinned", action="store_true",
                        help="also accept files that have no pinned SHA-256")
    parser.add_argument("--base_url", default=None,
                        help="take the files from this folder URL instead (a mirror, or file:///path/)")
    return parser


def main(args: argparse.Namespace) -> dict:
    return fetch_original(args.names or None, args.dest, args.allow_unpinned, args.base_url)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (HashMismatchError, OSError, ValueError) as e:
        sys.exit(f"fetch_original: {e}")
