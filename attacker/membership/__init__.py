"""Membership-inference attacks: threshold (Yeom), shadow models (Shokri / ML-Doctor), LiRA
offline (Carlini), label-only gap and augmentation (Choquette-Choo). The package itself imports
nothing heavy: ``attacks.make_attack`` builds an attack by name."""
