"""Names of the real slides in the shared data folder, and the resolutions tests pass for the two without a usable one."""

CMU1 = "CMU-1-Small-Region.svs"
NDPI = "test3-DAPI-2.ndpi"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"
BRACS = "BRACS_1640_N_3_cropped.tiff"

# The TCGA section has no resolution in its metadata. Its nuclei are about 4-6 level-0 pixels across,
# and nuclei are about 7-10 µm, so the scan is roughly 1.5-2 µm/px (a 5x scan).
TCGA_MPP_ESTIMATE = 2.0
# The BRACS crop reports 1000 µm/px. Its nuclei are about 30 px across, so it is roughly a 40x scan.
BRACS_MPP_ESTIMATE = 0.25
