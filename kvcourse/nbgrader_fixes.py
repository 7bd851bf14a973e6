"""A fix for nbgrader 0.9.6, used by the course's ``nbgrader_config.py`` at autograde.

When a learner duplicates a graded cell, nbgrader's ``DeduplicateIds`` keeps the last copy and
sets the others' ``metadata.nbgrader`` to ``{}``; ``OverwriteCells`` with
``add_missing_cells=True`` then reads ``metadata.nbgrader.grade_id`` of every cell that has the
key and crashes (``KeyError: 'grade_id'``), so the whole submission is scored 0. Removing the
key instead of emptying it keeps nbgrader's behaviour (the extra copy becomes an ordinary cell)
without the crash. ``tests/test_grading_robustness.py`` guards it.
"""

from __future__ import annotations

from nbgrader.preprocessors import DeduplicateIds


class DeduplicateIdsDroppingMetadata(DeduplicateIds):
    def preprocess_cell(self, cell, resources, cell_index):
        cell, resources = super().preprocess_cell(cell, resources, cell_index)
        if cell.get("metadata", {}).get("nbgrader", None) == {}:
            del cell.metadata["nbgrader"]
        return cell, resources
