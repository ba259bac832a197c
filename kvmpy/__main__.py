from .cli import main_process

main_process()
