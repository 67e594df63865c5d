"""Edge deployment: bundles for Jetson Orin boards (targets.py: boards and JetPack releases;
checks.py: what a JetPack's TensorRT parses; budget.py: memory; bundle.py: the folder)."""
