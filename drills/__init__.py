"""recserve drills: declarative disaster-recovery drills with RTO/RPO reports."""
