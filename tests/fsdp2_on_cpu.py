"""`python -m spaceft` under accelerate's FSDP2, on CPU with gloo (run by torchrun from
tests/test_multiprocess.py; not a test module itself).

accelerate (1.15) applies FSDP only to GPU-type process groups, and spaceft's launch check refuses FSDP
without GPUs for that reason (a real launch would silently run DDP). FSDP2's `fully_shard` itself runs on
CPU, so this script sets what `accelerate launch` with spaceft/recipes/accelerate/fsdp2.yaml would set,
then marks the process group as a GPU one once it exists and skips that check: the training loop, the
gathered save and the resume state then go through accelerate's real FSDP2 path.
"""

import os
import sys

os.environ.update(
    ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
    FSDP_CPU_RAM_EFFICIENT_LOADING="false", FSDP_OFFLOAD_PARAMS="false", FSDP_RESHARD_AFTER_FORWARD="true",
    FSDP_STATE_DICT_TYPE="FULL_STATE_DICT", FSDP_ACTIVATION_CHECKPOINTING="false",
    ACCELERATE_MIXED_PRECISION="no", FSDP_SYNC_MODULE_STATES="true", FSDP_USE_ORIG_PARAMS="true",
)  # fmt: skip

from accelerate import PartialState
from accelerate.utils import DistributedType

from spaceft import workspace
from spaceft.cli import main

_init = workspace.init_processes


def init_processes(timeout_s: float):
    state = _init(timeout_s)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # accelerate then wraps FSDP2
    return state


workspace.init_processes = init_processes
workspace.check_launch = lambda **kwargs: None
sys.exit(main(sys.argv[1:]))
