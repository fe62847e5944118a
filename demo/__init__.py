"""The main job on a fresh machine: export the bundled checkpoint, restore a real JPEG, compare.

    make demo                     # or: sodiff-demo --image coffee --qf 10 --out out/demo
"""
