"""The serving spec: what recserve needs to guard a Triton repository that Triton itself does not know."""
