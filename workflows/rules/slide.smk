# Per-slide rules (check -> tile -> infer -> export) and the cohort summary.
# Each rule is one `cellsam` call; names come from common.smk (pipeline.paths / pipeline.cohort).


wildcard_constraints:
    slide="|".join(re.escape(s) for s in SLIDE_IDS),


checkpoint check:
    input:
        slide=slide_path,
    output:
        status=status_file(),
    log:
        log_file("check"),
    params:
        slide_mpp=slide_mpp_flag,
    conda:
        "../envs/cellsam.yaml"
    container:
        config["container_image"]
    # An unreadable slide is recorded (ok: false, with the reason), not a failed job: the slide is
    # then left out of the DAG and listed as failed by the cohort report. The job fails only if
    # no status could be written.
    shell:
        "cellsam check {input.slide:q} {params.slide_mpp} -o {output.status:q} > {log:q} 2>&1"
        " || test -s {output.status:q}"


rule tile:
    input:
        slide=slide_path,
        status=status_file(),
    output:
        store=maybe_temp(directory(slide_file("store"))),
        tissue_png=slide_file("tissue_png"),
    log:
        log_file("tile"),
    benchmark:
        benchmark_file("tile")
    params:
        slide_mpp=slide_mpp_flag,
        mpp=config["tile"]["mpp"],
        chunk_px=config["tile"]["chunk_px"],
    threads: config["tile"]["workers"]
    conda:
        "../envs/cellsam.yaml"
    container:
        config["container_image"]
    shell:
        "cellsam tile {input.slide:q} -o {output.store:q} --slide-id {wildcards.slide}"
        " --mpp {params.mpp} --chunk {params.chunk_px} {params.slide_mpp} --workers {threads}"
        " --tissue-png {output.tissue_png:q} > {log:q} 2>&1"


rule infer:
    input:
        store=slide_file("store"),
    output:
        chunks=maybe_temp(directory(slide_file("chunks"))),
    log:
        log_file("infer"),
    benchmark:
        benchmark_file("infer")
    params:
        flags=infer_flags(),
    threads: config["infer"]["workers"]
    resources:
        gpu=infer_gpus(),
    conda:
        "../envs/cellsam.yaml"
    container:
        config["container_image"]
    shell:
        "cellsam infer {input.store:q} -o {output.chunks:q} {params.flags} --workers {threads} > {log:q} 2>&1"


rule export:
    input:
        store=slide_file("store"),
        chunks=slide_file("chunks"),
    output:
        **export_outputs(),
    log:
        log_file("export"),
    benchmark:
        benchmark_file("export")
    params:
        outdir=lambda wildcards, output: Path(output.summary).parent,
        flags=export_flags(),
    conda:
        "../envs/cellsam.yaml"
    container:
        config["container_image"]
    shell:
        "cellsam export {input.store:q} {input.chunks:q} -o {params.outdir:q} --slide-id {wildcards.slide}"
        " {params.flags} > {log:q} 2>&1"


rule cohort:
    input:
        unpack(cohort_inputs),
        sheet=config["samples"],
    output:
        **{ext: str(path) for ext, path in REPORT.items()},
    log:
        cohort_log(),
    params:
        results=lambda wildcards, output: Path(output.csv).parent,
        status_dir=str(LAYOUT.status_dir),
        logs_dir=str(LAYOUT.logs_dir),
        benchmarks_dir=str(LAYOUT.benchmarks_dir),
        prefix=lambda wildcards, output: Path(output.csv).with_suffix(""),
    conda:
        "../envs/cellsam.yaml"
    container:
        config["container_image"]
    shell:
        "cellsam cohort --results {params.results:q} --samples {input.sheet:q}"
        " --status-dir {params.status_dir:q} --logs {params.logs_dir:q} --benchmarks {params.benchmarks_dir:q}"
        " -o {params.prefix:q} > {log:q} 2>&1"
