"""Imported by every process the FSDP test launches (it is on their PYTHONPATH).

accelerate sends CPU processes to DDP only (its FSDP branch lists GPU-like devices). This turns that
branch on for them, with the plugin accelerate builds from the launch's FSDP config, so torch's
FSDP2 shards the model over gloo here as it does over NCCL on GPUs. FSDP_REPORT names a file per
process where `prepare` records how many parameters came out sharded.
"""

import json
import os

import accelerate.accelerator as accelerator_module
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init, _prepare = accelerator_module.Accelerator.__init__, accelerator_module.Accelerator.prepare


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.state.num_processes > 1:
        # AcceleratorState copies PartialState's fields whenever it is built again: set both.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def prepare(self, *args, **kwargs):
    from torch.distributed.tensor import DTensor

    out = _prepare(self, *args, **kwargs)
    report = os.environ.get("FSDP_REPORT")
    if report:
        params = [p for a in out if hasattr(a, "parameters") for p in a.parameters()]
        with open(f"{report}.{self.process_index}", "w") as f:
            json.dump({"type": str(self.distributed_type), "params": len(params),
                       "sharded": sum(isinstance(p, DTensor) for p in params)}, f)
    return out


accelerator_module.Accelerator.__init__ = __init__
accelerator_module.Accelerator.prepare = prepare
