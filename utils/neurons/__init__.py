"""Paper 2: second-order effects of MLP neurons, their PCs, sparse text decompositions, ablations and applications."""
