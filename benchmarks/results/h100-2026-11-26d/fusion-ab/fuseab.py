import sys
import mysproj.models.shared_prefix as S
mode = sys.argv.pop(1)
real = S.fuse_frozen_projections
def patched(layer):
    if mode == "none":
        return 0
    if mode == "qkv":
        mlp = layer.mlp
        keep = mlp.gate_proj.weight.requires_grad
        mlp.gate_proj.weight.requires_grad_(True)   # makes the gate/up group ineligible
        n = real(layer)
        mlp.gate_proj.weight.requires_grad_(keep)
        return n
    return real(layer)
S.fuse_frozen_projections = patched
from mysproj.cli import main
sys.exit(main(sys.argv[1:]))
