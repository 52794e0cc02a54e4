"""Paper 2 as its README prints it: every command line parses and, without weights or data, stops with one clear
line; compute_classifier_projection.py (paper 2's classifier name, QuickGELU text tower); compute_ablations.py
taking both papers' command lines."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN, GOLDEN_WEIGHTS, TINY_ARGS, run_inprocess, script_module

# paper 2's README, in its order (generate_adversarial_images.py has its own tests)
README_COMMANDS = """\
python compute_representations.py --model ViT-B-32 --pretrained openai --data_path $datapath --output_dir $outputdir
python compute_classifier_projection.py --model ViT-B-32 --pretrained openai --output_dir $outputdir
python compute_second_order_neuron_prs.py --model ViT-B-32 --pretrained openai --mlp_layer 9 --output_dir $outputdir --data_path $datapath
python compute_pcas.py --model ViT-B-32 --pretrained openai --mlp_layer 9 --output_dir $outputdir --input_dir $inputdir
python compute_ablations.py --model ViT-B-32 --pretrained openai --mlp_layer 9 --output_dir $outputdir --input_dir $inputdir --data_path $datapath
python compute_text_set_projection.py --model ViT-B-32 --pretrained openai --output_dir $outputdir --data_path text_descriptions/30k.txt
python compute_sparse_decomposition.py --model ViT-B-32 --pretrained openai --output_dir $outputdir --mlp_layer 9 --components 128 --text_descriptions 30k --device cuda:0
python compute_sparse_decomposition.py --model ViT-B-32 --pretrained openai --output_dir $outputdir --mlp_layer 9 --components 128 --text_descriptions 30k --device cuda:0 --evaluate
python compute_segmentation.py --device cuda:0 --model ViT-B-32 --pretrained openai --mlp_layers 9 --data_path imagenet_seg/gtsegs_ijcv.mat --save_img --output_dir $outputdir
""".splitlines()


def _argv(line: str, tmp: Path) -> list[str]:
    for var, sub in (("$datapath", tmp / "no_such_dataset"), ("$outputdir", tmp / "out"), ("$inputdir", tmp / "in")):
        line = line.replace(var, str(sub))
    return shlex.split(line)[1:]


@pytest.mark.parametrize("line", README_COMMANDS, ids=[l.split()[1] + ("+evaluate" if "--evaluate" in l else "")
                                                        for l in README_COMMANDS])
def test_readme_command_parses_and_fails_cleanly(line, tmp_path, monkeypatch):
    """As written: it parses, and without the weights (offline) or the data it exits 2 with one line."""
    import huggingface_hub.constants

    argv = _argv(line, tmp_path)
    args = script_module(argv[0]).get_args_parser().parse_args(argv[1:])
    assert args.model == "ViT-B-32" and args.pretrained == "openai"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, never the network
    code, _, err = run_inprocess(*argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{argv[0]}: error: ") and "Traceback" not in err, err


# ----------------------------------------------------------------------------- compute_classifier_projection.py
CLASSNAMES = GOLDEN / "text" / "classnames.txt"


def test_classifier_projection_paper2_name_matches_golden(tmp_path):
    code, out, err = run_inprocess("compute_classifier_projection.py", *TINY_ARGS, "--dataset", "golden",
                                   "--classnames", CLASSNAMES, "--output_dir", tmp_path)
    assert code == 0, err
    path = tmp_path / "golden_classifier_prsclip-tiny_prsclip-tiny_seed0.npy"  # {pretrained}: the checkpoint's stem
    c = np.load(path)
    assert c.dtype == np.float32 and c.shape == (32, 3)
    np.testing.assert_allclose(c, np.load(GOLDEN / "prs" / "golden_classifier_prsclip-tiny.npy"), atol=1e-6)
    record = json.loads(path.with_name(path.name + ".provenance.json").read_text())
    assert record["model"] == "prsclip-tiny" and record["pretrained"]["sha256"].startswith("d6cbeac8")
    assert record["shape"] == [32, 3] and record["num_classes"] == 3 and record["templates"] == 80
    assert not (tmp_path / "golden_classifier_prsclip-tiny.npy").exists()  # not paper 1's name


def test_classifier_projection_uses_quickgelu_text_tower(tmp_path):
    """With QuickGELU forced (as for OpenAI weights) the text tower is QuickGELU's: an independent per-class loop."""
    code, _, err = run_inprocess("compute_classifier_projection.py", *TINY_ARGS, "--force_quick_gelu", "--dataset",
                                 "golden", "--classnames", CLASSNAMES, "--output_dir", tmp_path)
    assert code == 0, err
    ours = np.load(tmp_path / "golden_classifier_prsclip-tiny_prsclip-tiny_seed0.npy")
    model = open_clip.create_model("prsclip-tiny-quickgelu", pretrained=str(GOLDEN_WEIGHTS)).eval()
    tokenizer = open_clip.get_tokenizer("prsclip-tiny-quickgelu")
    prompts = (GOLDEN / "text" / "prompts.txt").read_text().splitlines()  # class-major, 80 per class
    columns = []
    with torch.no_grad():
        for c in range(3):
            emb = F.normalize(model.encode_text(tokenizer(prompts[80 * c:80 * (c + 1)])), dim=-1).mean(0)
            columns.append((emb / emb.norm()).numpy())
    np.testing.assert_allclose(ours, np.stack(columns, 1), atol=1e-6)
    gelu = np.load(GOLDEN / "prs" / "golden_classifier_prsclip-tiny.npy")
    assert np.abs(ours - gelu).max() > 1e-3  # the activation matters


def test_classifier_projection_help_names_the_gelu_deviation():
    text = script_module("compute_classifier_projection.py").get_args_parser().format_help()
    assert "QuickGELU" in text and "exact GELU" in text and "{dataset}_classifier_{model}_{pretrained}.npy" in text
    assert "(default: ViT-B-32)" in text and "(default: openai)" in text


# ----------------------------------------------------------------------------- compute_ablations.py, both papers
@pytest.mark.parametrize("flags,named", [
    (["--figures_dir", "x", "--mlp_layer", "1"], ["--figures_dir", "--mlp_layer"]),
    (["--chunk", "4", "--data_path", "x", "--batch_size", "2"], ["--chunk", "--batch_size", "--data_path"]),
    (["--output_dir", "x"], ["--output_dir", "--mlp_layer"]),  # paper 2 only, but none of its selectors
])
def test_ablations_flags_of_neither_study(flags, named, tmp_path):
    code, _, err = run_inprocess("compute_ablations.py", "--model", "prsclip-tiny", "--input_dir", tmp_path, *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for flag in named:
        assert flag in err


def test_ablations_help_explains_both():
    text = script_module("compute_ablations.py").get_args_parser().format_help()
    for s in ("Paper 1", "Paper 2", "--figures_dir", "--mlp_layer", "both studies", "ViT-H-14", "ViT-B-32"):
        assert s in text, s
