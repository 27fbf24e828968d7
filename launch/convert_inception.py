"""Convert pytorch-fid's FID Inception-V3 weights to a file `evaluation.inception.weights` loads.

python -m launch.convert_inception \
    --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

The .pth is read with torch.load(weights_only=True) (no arbitrary unpickling); torch is needed
only here (pip install -e ".[reference]"). Output: .npz, or .safetensors by extension.
"""

import json

from absl import app, flags

from diffussm_jax.evaluation import inception
from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "pt_inception-2015-12-05-6726825d.pth or a state dict .pth.")
flags.DEFINE_string("output", None, "Output path ending in .npz or .safetensors.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(json.dumps(inception.convert_checkpoint(FLAGS.input, FLAGS.output), indent=2))


if __name__ == "__main__":
    cli.run(main)
