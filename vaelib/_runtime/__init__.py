"""Private runtime policy: the device, CPU threads and progress bars vaelib's loops run with."""
