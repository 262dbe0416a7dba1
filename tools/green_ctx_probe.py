import lowlevel
for counts in ([64], [64, 64], [16], [16, 112], [112], [112, 16], [96, 32], [32, 96], [64, 32, 32]):
    try:
        p = lowlevel.sm_partition(counts); print(counts, "->", p.sm_counts); p.close()
    except Exception as e:
        print(counts, "FAILED", e)
