"""One command per paper: run its scripts in order, then write REPORT.md with our numbers beside the published ones.

    python reproduce.py paper1 --model ViT-B-16 --pretrained laion2b_s34b_b88k --imagenet PATH \\
        [--imagenet_seg FILE] [--waterbirds PATH] --output_dir runs/b16
    python reproduce.py paper2 --model ViT-B-32 --pretrained openai --imagenet PATH [--imagenet_seg FILE] \\
        --mlp_layers 9 --output_dir runs/b32
    python reproduce.py splice --model open_clip:ViT-B-32 --cifar10 PATH --output_dir runs/splice
    python reproduce.py paper1 --preview --output_dir runs/b16  # REPORT.md's tables, published numbers only
    python reproduce.py paper1 --smoke --output_dir /tmp/smoke   # tiny test model, bundled photos: <1 min of CPU

Every step is one of this repository's scripts, run as a subprocess from the repository root; its exact command
line is printed first (and listed in REPORT.md), so any step can be rerun alone. Running the same command again
skips what is up to date and resumes a killed step. A step whose data was not given (no --imagenet_seg, ...) is
skipped, and so is every step that reads its outputs, with the missing flag said on the console and in
REPORT.md; when nothing at all can run, reproduce.py stops with status 2. --steps runs a subset (names as listed
by --dry_run; "neuron_prs" selects every layer's), --dry_run prints the plan without running anything, --preview
prints the REPORT.md the run would write (the published numbers, ours as "—" until they exist), --fresh reruns
everything from scratch. Each step's output is also kept in {output_dir}/logs/{step}.log. REPORT.md and
report.json (the same content) go to --output_dir. The plan, the runner and the report are utils/reproduce/; see
docs/reproduce.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from functools import partial

from utils import REPO_ROOT
from utils.cli import run, say_wrote
from utils.reproduce.plan import DATA_FLAGS, PIPELINES, Settings
from utils.reproduce.runner import Launcher, run_pipeline, run_subprocess


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("reproduce.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", choices=sorted(PIPELINES), help="which paper's experiments")
    parser.add_argument("--output_dir", required=True, help="where every output, REPORT.md and report.json go")
    parser.add_argument("--model", default=None,
                        help="open_clip model (default: paper1 ViT-B-16, paper2 ViT-B-32, splice open_clip:ViT-B-32)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: paper1 "
                        "laion2b_s34b_b88k, paper2 openai; required with another --model)")
    parser.add_argument("--model_config", default=None, help="extra open_clip model config (.json or folder)")
    parser.add_argument("--force_quick_gelu", action="store_true", help="QuickGELU whatever the config says")
    parser.add_argument("--device", default=None, help="torch device of every step (default: the scripts' own)")
    parser.add_argument("--batch_size", type=int, default=None, help="batch size of the model-running steps "
                        "(default: the scripts' own)")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: the scripts')")
    parser.add_argument("--imagenet", default=None, help="ImageNet root (torchvision layout: train/, val/, meta)")
    parser.add_argument("--imagenet_seg", default=None, help="gtsegs_ijcv.mat (ImageNet-segmentation)")
    parser.add_argument("--waterbirds", default=None, help="Waterbirds root (with metadata.csv); paper1")
    parser.add_argument("--cifar10", default=None, help="CIFAR-10 root (torchvision files); splice")
    parser.add_argument("--mlp_layers", type=int, nargs="+", default=None,
                        help="paper2: the MLP layers of the ablations and sparse decompositions (default 9, as "
                             "Table 1; --smoke: 1)")
    parser.add_argument("--segmentation_layers", type=int, nargs="+", default=None,
                        help="paper2: the MLP layers whose neurons segment (default 8 9 10, as Table 4; --smoke: 0 "
                             "1); layers not in --mlp_layers get only neuron_prs and pcas, and only with "
                             "--imagenet_seg")
    parser.add_argument("--steps", default=None, help="comma-separated steps to run (default: all)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and what would run; run nothing")
    parser.add_argument("--preview", action="store_true", help="print the REPORT.md this run would write (the "
                        "published numbers beside ours, '—' where there is no result yet); run and write nothing")
    parser.add_argument("--fresh", action="store_true", help="rerun every step from scratch (no skipping, no resume)")
    parser.add_argument("--smoke", action="store_true", help="the tiny test model on the bundled photos and "
                        "small synthetic files, end to end in under a minute of CPU time (checks the plumbing, not "
                        "the numbers)")
    return parser


def echo(text: str) -> None:
    """A step's output, shown as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def main(args: argparse.Namespace, launch: Launcher | None = None) -> dict:
    """Run the pipeline; ``launch`` runs each step (default: a subprocess whose output is shown here)."""
    settings = Settings(args.pipeline, args.output_dir, model=args.model, pretrained=args.pretrained,
                        model_config=args.model_config, force_quick_gelu=args.force_quick_gelu, device=args.device,
                        allow_tf32=args.allow_tf32, batch_size=args.batch_size, num_workers=args.num_workers,
                        data={k: getattr(args, k) for k in DATA_FLAGS}, mlp_layers=args.mlp_layers,
                        segmentation_layers=args.segmentation_layers, smoke=args.smoke)
    if not args.preview:
        print(f"{args.pipeline}: commands run in {REPO_ROOT}", flush=True)
    outcome = run_pipeline(settings, args.steps, dry_run=args.dry_run, fresh=args.fresh, preview=args.preview,
                           launch=launch or partial(run_subprocess, echo=echo),
                           command=shlex.join(["python", "reproduce.py", *sys.argv[1:]]))
    if args.preview:
        print(outcome.markdown, end="")
    elif args.dry_run:
        for r in outcome.steps:
            print(f"{r['name']:24s} {r['status']:32s} {r['command'] or ''}".rstrip())
    else:
        print()
        say_wrote(outcome.written, f"(failed: {', '.join(outcome.failed)})" if outcome.failed else "")
    if outcome.failed:
        sys.exit(1)
    return outcome.report or {"steps": outcome.steps}


if __name__ == "__main__":
    run(main, get_args_parser())
