"""`safejax demo`: the whole method end to end on the bundled data (stages.py runs the stages of
pipeline.py in order, each resumable; settings in configs/demo/*.gin)."""
