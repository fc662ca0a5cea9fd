"""recserve control plane: owns Triton instances, HAProxy and rollouts (embedded runtime in triton.py)."""

if __name__ != "recserve.control":  # one import identity: a second copy of every module would split their state
    raise ImportError(f"import recserve.control, not {__name__} (the folder control/ is the package recserve.control)")
