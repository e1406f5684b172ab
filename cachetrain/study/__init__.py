"""The layerwise study's analysis (issue 15): linear probes of frozen stage outputs (probe), linear CKA between
greedy and end-to-end features (cka), the critical-layer rule (critical), and the report over run directories
(report, plots). Pure functions over tensors and plain files; training and the CLI call them."""
