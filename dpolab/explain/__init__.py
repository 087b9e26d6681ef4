"""Why training moved a behaviour: linear probes, per-neuron decomposition with random nulls, ablation and
patching (`dpolab explain`)."""
