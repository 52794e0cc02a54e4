"""Second-order ablation study (paper 2, section 4): do the neurons' first PCs and their few significant
images explain the neurons' second-order effects? (The second paper's compute_ablations.py.)

For each image of --dataset/--split the second-order effects of all neurons of --mlp_layer are computed
(as compute_second_order_neuron_prs.py does) and zero-shot accuracy is reported for:
  baseline                     coefficient * r/||r|| @ classifier
  all_neurons_mean_ablated     every neuron's effect replaced by its training mean
  only_non_significant_kept    the mean-ablated one plus the centred effects of non-significant neurons
  only_significant_kept        the mean-ablated one plus the centred effects of significant neurons
  projected_to_first_pc        each effect replaced by its mean plus its projection on the neuron's first PC
A neuron is significant on an image when its centred norm exceeds its top_k_pca-th largest training norm.

Reads from --input_dir the training files of compute_second_order_neuron_prs.py and compute_pcas.py
({train_dataset}_{train_split}_mlps_{model}_{pretrained}_{mlp_layer}[_{top_k_pca}_pca|_norm].npy) and the
classifier {train_dataset}_classifier_{model}_{pretrained}.npy, else {train_dataset}_classifier_{model}.npy
(--input_dir first, then --output_dir). Default: ImageNet val, 10% (every 10th image), not the original's
ImageNet-R. Prints the accuracies and writes them as JSON, with a bar chart (PNG), to --output_dir.
"""
import argparse

from utils.cli import add_flags, run, run_second_order_ablations, second_order_ablation_flags


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("compute_second_order_ablations.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, second_order_ablation_flags())
    return parser


main = run_second_order_ablations  # the study, its printout and its files: shared with compute_ablations.py

if __name__ == "__main__":
    run(main, get_args_parser())
