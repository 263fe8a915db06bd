"""Jinja2 templates for sbatch scripts and container definitions (installed as hpcinfer.job_templates)."""
