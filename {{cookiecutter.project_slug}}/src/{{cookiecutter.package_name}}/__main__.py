from {{ cookiecutter.package_name }}.cli import main

main()
