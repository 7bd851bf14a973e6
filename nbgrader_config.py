"""nbgrader configuration: solutions/ is the instructor source, notebooks/ the learner release.

See docs/instructor-guide.md for the workflow these settings serve.
"""

import os

c = get_config()  # noqa: F821 - provided by nbgrader

c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "notebooks"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(c.CourseDirectory.root, "gradebook.db")

# A slow but correct answer on a laptop CPU must not time out (nbgrader's default is 30 s a cell);
# an infinite loop still ends: that cell scores 0, the kernel is interrupted, grading goes on.
c.Execute.timeout = int(os.environ.get("KVCOURSE_CELL_TIMEOUT", "180"))
c.Execute.interrupt_on_timeout = True
# A kernel must start within this time, or nbgrader drops the whole submission (no autograded notebook).
# nbclient's default, 60 s, was exceeded when a dozen kernels started at once on 2 loaded cores.
c.Execute.startup_timeout = int(os.environ.get("KVCOURSE_KERNEL_STARTUP_TIMEOUT", "300"))

# Any stderr output in a test cell scores it 0. A warning raised inside a learner's (correct) code
# must not cost points: kernels started by nbgrader inherit this environment.
os.environ["PYTHONWARNINGS"] = "ignore"
# The course runs offline on its bundled model; a grader must never wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Learners delete test cells: put them back from the source notebook before grading.
c.OverwriteCells.add_missing_cells = True
# ...and duplicate them: nbgrader 0.9.6 then crashes on the whole submission (see kvcourse/nbgrader_fixes.py).
try:
    from nbgrader.preprocessors import CheckCellMetadata, ClearOutput, OverwriteCells, OverwriteKernelspec

    from kvcourse.nbgrader_fixes import DeduplicateIdsDroppingMetadata

    c.Autograde.sanitize_preprocessors = [
        ClearOutput, DeduplicateIdsDroppingMetadata, OverwriteKernelspec, OverwriteCells, CheckCellMetadata,
    ]
except ImportError:  # kvcourse not installed where nbgrader runs: nbgrader's own (crashing) default
    pass

# `nbgrader zip_collect ID` on an LMS export (downloaded/ID/archive/*.zip) with one folder per learner
# inside, e.g. alice/kv_cache.ipynb: the folder names the learner. For another naming scheme, change
# the regular expression (it sees the whole path of each extracted file).
c.ZipCollectApp.collector_plugin = "nbgrader.plugins.zipcollect.FileNameCollectorPlugin"
c.FileNameCollectorPlugin.named_regexp = r".*/(?P<student_id>[A-Za-z0-9_-][A-Za-z0-9_.-]*)/(?P<file_id>[A-Za-z0-9_-][A-Za-z0-9_.-]*\.ipynb)$"
