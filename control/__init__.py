"""recserve control plane: owns Triton instances, HAProxy and rollouts (embedded runtime in triton.py)."""
