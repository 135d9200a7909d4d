"""Before/after figure of the CMU-1 hair-follicle keratin (docs/img/cmu1_keratin_joint.png).

    python benchmarks/figure_cmu_keratin.py BEFORE.geojson.gz AFTER.geojson.gz OUT.png

BEFORE / AFTER: ``cellsam segment`` outputs of ``CMU-1-Small-Region.svs`` (shipped model / joint
fine-tuning). Draws their outlines on level-0 pixels x 850-2000, y 880-1880, side by side.
"""
import sys, gzip, json, openslide
from PIL import Image, ImageDraw, ImageFont
before, after, out = sys.argv[1:4]
x0,y0,w,h,sc = 850, 880, 1150, 1000, 0.55
from pathlib import Path
s=openslide.OpenSlide(str(Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'slides' / 'CMU-1-Small-Region.svs'))
base=s.read_region((x0,y0),0,(w,h)).convert('RGB').resize((int(w*sc),int(h*sc)), Image.LANCZOS)
panels=[]
for gj,title in ((before,'shipped model'),(after,'joint fine-tuning, run 4 (not shipped)')):
    im=base.copy(); d=ImageDraw.Draw(im)
    feats=json.load(gzip.open(gj)); feats=feats['features'] if isinstance(feats,dict) else feats
    n=0
    for f in feats:
        g=f['geometry']; ring=(g['coordinates'] if g['type']=='Polygon' else g['coordinates'][0])[0]
        pts=[((x-x0)*sc,(y-y0)*sc) for x,y in ring]
        if all(-5<px<w*sc+5 and -5<py<h*sc+5 for px,py in pts):
            d.line(pts+[pts[0]],fill=(0,200,0),width=1); n+=1
    d.rectangle([0,0,im.width,18],fill=(255,255,255)); d.text((4,3),f'{title}: {n} nuclei in view',fill=(0,0,0))
    # 100 µm scale bar (0.499 µm/px level 0)
    L=100/0.499*sc; d.rectangle([8,im.height-14,8+L,im.height-8],fill=(0,0,0)); d.text((12+L,im.height-18),'100 µm',fill=(0,0,0))
    panels.append(im)
c=Image.new('RGB',(panels[0].width*2+8,panels[0].height),'white')
c.paste(panels[0],(0,0)); c.paste(panels[1],(panels[0].width+8,0))
c.convert('RGB').quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
