"""What the target service plugs in to defend itself: output policies and stealing detectors."""
