"""recserve on Kubernetes: the operator (control plane with a Kubernetes driver) and its manifests' checks."""
