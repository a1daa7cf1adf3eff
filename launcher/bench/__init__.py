"""`smoe bench`: the layer (time and memory) and quality (BPC by k over seeds) benchmarks."""
