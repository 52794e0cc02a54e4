"""Files: atomic writes, streamed arrays, output names, provenance records and the readers of other scripts' outputs."""
