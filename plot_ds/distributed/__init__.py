"""Process groups and what PLOT needs of a ZeRO-3-partitioned embedding matrix: its layout, the slice, rows from their owners, and what each way costs."""
