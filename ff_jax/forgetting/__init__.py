"""The method: forgetting signals from per-example scores (`signals`), first-order forgetting by
gradient alignment (`gradients`), and thresholds on a signal with the label-free separation check
(`thresholds`)."""
