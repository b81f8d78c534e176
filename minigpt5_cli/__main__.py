from minigpt5_cli.cli import main

main()
