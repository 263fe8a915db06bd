"""Parsers of Slurm command output, on literal output captured from Slurm 22.05."""
from __future__ import annotations

import pytest

from hpcinfer.slurm import commands
from hpcinfer.slurm.commands import AcctEntry, QueueEntry


def test_parse_sbatch_parsable():
    assert commands.parse_sbatch("20956421\n").job_id == "20956421"
    sub = commands.parse_sbatch("sbatch: warning: can't honor --ntasks-per-node\n20956421;cedar\n")
    assert (sub.job_id, sub.cluster) == ("20956421", "cedar")
    with pytest.raises(commands.SlurmError):
        commands.parse_sbatch("Submitted batch job 12\n")


def test_parse_squeue_array_tasks():
    out = ("7_1|PENDING|JobArrayTaskLimit\n7_2|PENDING|JobArrayTaskLimit\n"
           "7_3|PENDING|JobArrayTaskLimit\n7_0|RUNNING|None\n")
    entries = commands.parse_squeue(out)
    assert entries[0] == QueueEntry("7_1", "PENDING", "JobArrayTaskLimit")
    assert entries[3] == QueueEntry("7_0", "RUNNING", "None")


def test_parse_sacct_expands_pending_ranges_and_keeps_requeued():
    out = ("JobID|State|ExitCode\n"
           "20956421_0|RUNNING|0:0\n"
           "20956421_1|REQUEUED|0:0\n"
           "20956421_1|COMPLETED|0:0\n"
           "20956421_1.batch|COMPLETED|0:0\n"
           "20956421_[2-4%25]|PENDING|0:0\n"
           "20956422|CANCELLED by 0|0:15\n")
    entries = commands.parse_sacct(out)
    assert AcctEntry("20956421_1", "REQUEUED", "0:0") in entries
    assert [e.job_id for e in entries if e.state == "PENDING"] == [
        "20956421_2", "20956421_3", "20956421_4"]
    assert AcctEntry("20956422", "CANCELLED", "0:15") in entries
    assert not any(".batch" in e.job_id for e in entries)
    assert commands.parse_sacct("") == []
    assert commands.parse_sacct("JobID|State|ExitCode\n") == []


def test_parse_scontrol_show_job_keeps_values_with_spaces_and_equals():
    out = ("JobId=8 ArrayJobId=7 ArrayTaskId=0 ArrayTaskThrottle=1 JobName=sl.sh UserId=root(0) "
           "JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
           "ExitCode=0:0 NodeList=vm TRES=cpu=1,node=1,billing=1 Command=/tmp/my job.sh "
           "WorkDir=/tmp StdOut=/tmp/sl-7_0.out Power= \n")
    [record] = commands.parse_scontrol_show_job(out)
    assert record["JobState"] == "RUNNING" and record["Restarts"] == "0"
    assert record["ArrayJobId"] == "7" and record["ArrayTaskId"] == "0"
    assert record["TRES"] == "cpu=1,node=1,billing=1"
    assert record["Command"] == "/tmp/my job.sh"
    assert record["Power"] == ""


def test_missing_command_says_what_to_do(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(commands.SlurmMissing, match=r"hpcinfer run JOB --local"):
        commands.sbatch("submit.sbatch", cwd="/")


def test_rejection_carries_slurms_message_and_a_hint():
    err = commands.SlurmError("sbatch", "sbatch: error: Batch job submission failed: Invalid account "
                              "or account/partition combination specified\n",
                              commands._hint_for("Invalid account or account/partition combination"))
    text = str(err)
    assert "Invalid account" in text and "resources.account" in text and "\n" not in text


def test_sacct_is_retried_after_a_failure(tmp_path, monkeypatch, caplog):
    """A stub sacct on PATH fails once (slurmdbd hiccup), then answers."""
    count = tmp_path / "count"
    stub = tmp_path / "sacct"
    stub.write_text(f"""#!/bin/bash
n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}
if [ "$n" = 0 ]; then echo "sacct: error: slurmdbd: Connection refused" >&2; exit 1; fi
printf 'JobID|State|ExitCode\\n12_0|COMPLETED|0:0\\n'
""")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    entries = commands.sacct(["12"], retries=2, backoff_s=0.01)
    assert entries == [AcctEntry("12_0", "COMPLETED", "0:0")]
    assert count.read_text().strip() == "2"
    assert "Connection refused" in caplog.text
    count.write_text("0")
    stub.write_text("#!/bin/bash\necho 'sacct: error: down' >&2\nexit 1\n")
    with pytest.raises(commands.SlurmError, match="slurmdbd up"):
        commands.sacct(["12"], retries=1, backoff_s=0.01)
