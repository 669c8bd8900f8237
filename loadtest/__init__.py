"""Virtual Communications Hubs (and, later, HAN devices) built from the protocol/ machines, the
runner that starts thousands of them, the demo and the benchmark."""
