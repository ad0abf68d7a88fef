"""privcode: differentially private code synthesis (PrivCode, arXiv 2512.05459) as a pipeline.

    privcode --help               # one subcommand per pipeline stage
    snakemake --cores all results/table3.csv
"""
__version__ = "0.1.0"
