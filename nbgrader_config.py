"""nbgrader configuration: solutions/ is the instructor source, notebooks/ the learner release."""

c = get_config()  # noqa: F821 - provided by nbgrader

c.CourseDirectory.root = "."
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "notebooks"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"
c.CourseDirectory.db_url = "sqlite:///gradebook.db"
# A slow but correct answer on a laptop CPU must not time out (the default is 30 s per cell).
c.Execute.timeout = 180
# Learners' copies may hold outputs; the release is always generated without them.
c.ClearOutput.enabled = True
