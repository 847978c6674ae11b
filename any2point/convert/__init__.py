"""Converters of the authors' released checkpoints (Any2Point and Point-PEFT) into this project's."""
