"""The digits example trainguard's demo, DVC pipeline, tests and benchmarks use: the embedded data set and its
shards, two small models, the two attacks on the data (poisoning before signing, tampering after), and the demo
itself. Not part of the installed product: put `examples/` on the path to import it."""
