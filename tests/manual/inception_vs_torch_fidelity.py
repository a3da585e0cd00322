"""Check by hand (not collected by pytest): our InceptionFeatures against torch-fidelity's
FeatureExtractorInceptionV3, on the same random-weight file in the pt_inception-2015-12-05 layout
and the same uint8 images. Prints one JSON line with the largest and the relative difference.

torch-fidelity is not a dependency: its package ``__init__`` imports torchvision, which does not
import against this project's CPU torch (DESIGN.md §4). Its Inception module itself needs only
torch, so it is loaded from an unpacked wheel under a bare package object:

    pip download --no-deps torch-fidelity -d /tmp/tf && unzip -q /tmp/tf/*.whl -d /tmp/tf/src
    PYTHONPATH=$PWD python tests/manual/inception_vs_torch_fidelity.py /tmp/tf/src/torch_fidelity

Where torch-fidelity imports normally (a machine with a working torchvision), pass ``--installed``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types

import torch

from model_zoo.metrics import InceptionFeatures
from tests.test_metrics import pt_inception_2015_12_05_layout


def main() -> None:
    if sys.argv[1:] != ["--installed"]:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = [sys.argv[1]]
        sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) * 0.1 for key, shape in pt_inception_2015_12_05_layout().items()}
    for key in state:
        if key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = state[key].abs() + 0.5
    path = os.path.join(tempfile.mkdtemp(), "pt_inception-2015-12-05.pth")
    torch.save(state, path)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    ours = InceptionFeatures(path)
    images = torch.randint(0, 256, (4, 3, 128, 128), generator=generator, dtype=torch.uint8)
    with torch.no_grad():
        a, b = theirs(images)[0], ours(images.float() / 255)
    print(json.dumps({"max_abs_diff": (a - b).abs().max().item(), "max_abs_feature": a.abs().max().item(),
                      "relative_l2_diff": ((a - b).norm() / a.norm()).item()}))


if __name__ == "__main__":
    main()
