"""Protocol front ends. Each sees only ``storage.blockdev.BlockDevice``; siblings do not import
each other."""
