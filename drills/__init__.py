"""recserve drills: declarative disaster-recovery drills with RTO/RPO reports."""

if __name__ != "recserve.drills":  # one import identity: a second copy of every module would split their state
    raise ImportError(f"import recserve.drills, not {__name__} (the folder drills/ is the package recserve.drills)")
