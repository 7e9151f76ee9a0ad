"""Fine-tune one trial: data, parameter groups, the training loop and its speed stand-ins, the objective."""
