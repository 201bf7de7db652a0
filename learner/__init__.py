"""Pure losses and advantages, schedules, and the Learner actor class."""
