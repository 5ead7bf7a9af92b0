"""The measurement harness of issue 4: tandem against a minimal in-process baseline, in one run."""
