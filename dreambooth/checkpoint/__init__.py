"""Checkpoint I/O: single-file (LDM / SGM) checkpoints <-> the working diffusers folder.

keymap.py   the table of key renames between diffusers and the original layout
layout.py   diffusers configs read from a file's tensors; the inference yaml written for hosts
tensorio.py lazy readers (safetensors, weights-only .ckpt) and one-tensor-at-a-time writers
convert.py  import (file -> working folder) and the export plan (working folder -> file)
export.py   write_single_file: the atomic export the CLI and the trainer call
tiny.py     write_tiny_checkpoint: seeded tiny random models for demos and tests
"""
