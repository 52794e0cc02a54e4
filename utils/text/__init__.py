"""Text: embeddings and zero-shot classifiers, the text sets, class names, TextSpan and PCLens."""
