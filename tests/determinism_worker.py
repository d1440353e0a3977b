"""One evaluation with every "auto" choice on, written to a file, for
test_determinism.py: ``python determinism_worker.py <out.pt> <calibration folder>``.

A spiking MoE classifier with enough busy experts for the CPU's grouped-GEMM rule, a spiking MoE
language model (attention, shared experts), evaluated without gradients (event-driven
synapses by density, the LIF kernel "auto") and counted by the energy counter (its pass swaps
the experts' strategies).
"""

import os
import sys

import torch

from spiking_moe import SpikingMoEClassifier, SpikingMoELM
from spiking_moe.functional.kernels import cpu_fused, event_cpu
from spiking_moe.strategies import CPU_GROUPED_MIN_EXPERTS
from spiking_moe.training import count_energy


def main(out: str, calibration_folder: str) -> None:
    # The C++ kernels load from the shared build folder first (an empty one would rebuild them,
    # 30-60 s); the event-driven calibration is looked up when first needed, so it goes to the
    # folder named here, which both processes of the test share.
    cpu_fused.EXTENSION.load()
    event_cpu.EXTENSION.load()
    os.environ["TORCH_EXTENSIONS_DIR"] = calibration_folder
    torch.manual_seed(0)
    classifier = SpikingMoEClassifier(
        32, 5, hidden_features=32, num_experts=CPU_GROUPED_MIN_EXPERTS, k=2, expert_hidden=16,
        threshold=0.5, reset="zero",
    ).eval()  # fmt: skip
    with torch.no_grad():
        # Every hidden neuron copies one input's spikes, and the router's rows are unit
        # vectors of zero mean: each token's rates point somewhere else, so the tokens spread
        # over all experts, enough for the CPU's grouped-GEMM rule.
        classifier.input_layer.weight.copy_(torch.eye(32) * 2)
        classifier.input_layer.bias.zero_()
        w = classifier.layers[0].router.proj.weight
        w.sub_(w.mean(1, keepdim=True)).div_(w.norm(dim=1, keepdim=True))
    lm = SpikingMoELM(
        64, 16, 2, 2, 12, num_experts=4, k=1, expert_hidden=16, shared_experts=1, threshold=0.5
    ).eval()
    generator = torch.Generator().manual_seed(1)
    x = (torch.rand(6, 1024, 32, generator=generator) < 0.3).float()
    ids = torch.randint(0, 64, (3, 12), generator=generator)
    results = {}
    with torch.no_grad():
        for name, model, inputs in (("classifier", classifier, x), ("lm", lm, ids)):
            out_ = model(inputs)
            counts, dense = count_energy(model, inputs)
            results[name] = {
                "logits": out_.logits,
                "busy": [int((r.tokens_per_expert > 0).sum()) for r in out_.routing],
                "counts": [vars(layer) for layer in counts.layers],
                "dense": [vars(layer) for layer in dense.layers],
            }
    torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
